from server.cli import main

main(prog_name="quota-ledger")
