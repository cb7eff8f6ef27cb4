import sys

from zenalign.cli import main

sys.exit(main())
