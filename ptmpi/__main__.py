import sys

from ptmpi.cli import main

sys.exit(main())
