"""`python -m trainer.pretrain ...`: backbone pretraining (see `trainer.pretrain.train`)."""

import sys

from trainer.pretrain.train import main

if __name__ == "__main__":
    sys.exit(main())
