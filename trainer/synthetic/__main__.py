"""`python -m trainer.synthetic --out D ...`: writes an offline data set (see `trainer.synthetic.cli`)."""

import sys

from trainer.synthetic.cli import main

if __name__ == "__main__":
    sys.exit(main())
