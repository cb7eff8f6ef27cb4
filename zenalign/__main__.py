import sys

from zenalign.commands.cli import main

sys.exit(main())
