from jobs.core.processes import exit_with


def main() -> int:
    # Imported here: a Ctrl-C during the imports (a second or so) then exits as quietly as one after them.
    from jobs.doors.cli import main as cli_main

    return cli_main()


exit_with(main)
