import sys

from padim.cli.main import main

sys.exit(main())
