from gateway.launch import main

main()
