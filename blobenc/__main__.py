from blobenc.cli import main

main()
