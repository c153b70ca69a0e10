import sys

from fsbridge.cli import main

sys.exit(main())
