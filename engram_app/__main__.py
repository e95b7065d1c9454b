from engram_app.cli import main

main()
