from klaq.cli import main

main(prog_name="klaq")
