"""The dashboard's Streamlit server: `python -m dashboard.server [streamlit run's options]` serves app.py, in the
product's own navigation from the first request on.

Why not plain `streamlit run app.py`: Streamlit serves a `pages/` folder beside its entry script in its older
multipage mode until some session runs app.py's st.navigation, so a fresh server's first visitor of a deep link
(/cluster) saw Streamlit's navigation over the file names ("app", "cluster", ...), app.py itself among them."""

from __future__ import annotations

import sys
from pathlib import Path

from streamlit.runtime.pages_manager import PagesManager
from streamlit.web import cli

from cluster import backends
from jobs.core.errors import EmbedDeckError
from jobs.core.settings import Settings

APP = Path(__file__).resolve().parent.parent / "app.py"


def main(argv: list[str]) -> None:
    """Run Streamlit's own `streamlit run app.py` with these options in this process, pages/ mode off; exit 2 first
    where a number or the cluster backend the pages read is set wrong (a page met it as a traceback in the
    browser)."""
    try:
        Settings().check_values()
        backends.configured()
    except EmbedDeckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    # The flag st.navigation itself clears, and the one Streamlit reads before a session's first script run.
    PagesManager.uses_pages_directory = False
    sys.argv = ["streamlit", "run", str(APP), *argv]
    cli.main()


if __name__ == "__main__":
    main(sys.argv[1:])
