import sys

from atrium.cli import main

sys.exit(main())
