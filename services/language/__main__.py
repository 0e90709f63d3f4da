from services.language.server import main

main()
