"""``python -m streams``: run a Faust worker for :mod:`streams.app` (like ``faust -A streams.app
worker -l info``)."""

from streams.app import run_worker

if __name__ == "__main__":
    run_worker()
