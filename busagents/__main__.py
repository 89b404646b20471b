from busagents.cli import main

main()
