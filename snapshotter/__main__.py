from snapshotter.cli import run

run()
