from vmstream.cli.main import main

main()
