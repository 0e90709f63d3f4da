from services.language.app import main

main()
