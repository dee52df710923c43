"""``tether dashboard``: the fleet, halts, audit and ledger live in a browser.

Its own process (never inside a coordinator's loop), talking to the Admin API through
``AdminClient`` with its own credentials. Needs the ``dashboard`` extra (Starlette,
sse-starlette, uvicorn); the CLI imports this package only for the ``dashboard`` verb.
"""

from tether._dashboard._app import build_app
from tether._dashboard._calls import connector
from tether._dashboard._config import DashboardConfig, load_config
from tether._dashboard._serve import bind, run_dashboard

__all__ = ["DashboardConfig", "bind", "build_app", "connector", "load_config", "run_dashboard"]
