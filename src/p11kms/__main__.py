import sys

from p11kms.cli import main

sys.exit(main())
