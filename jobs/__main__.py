import sys

from jobs.doors.cli import main

sys.exit(main())
