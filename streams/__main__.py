"""``python -m streams``: run a worker for the agents of the environment (like ``faust -A
streams.app worker -l info``)."""

from streams.app import create_app, run_worker

if __name__ == "__main__":
    run_worker(create_app())
