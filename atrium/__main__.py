import sys

from atrium.cli.main import main

sys.exit(main())
