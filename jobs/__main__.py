from jobs.core.processes import exit_with
from jobs.doors.cli import main

exit_with(main)
