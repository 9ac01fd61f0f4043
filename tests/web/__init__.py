"""A package only so that tests/web/conftest.py is imported as ``web.conftest``: a plain
``conftest`` here would replace tests/conftest.py in sys.modules, and later ``from conftest import
free_port`` (tests/agent, tests/bridge, tests/reliability) would find this one instead."""
