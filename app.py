"""Start the Engram Studio web app: ``python app.py [--home DIR] [--model M] [--device D] [--host H] [--port P]``.

The same as ``python -m engram_app serve``; ``make run`` sets up the environment and runs this.
"""

from engram_app.cli import serve

if __name__ == "__main__":
    serve.main(prog_name="app.py")
