"""`python -m trainer.synthetic --out D ...`: writes an offline data set (see `trainer.synthetic.datasets`)."""

import sys

from trainer.synthetic.datasets import main

if __name__ == "__main__":
    sys.exit(main())
