from klaq._syspath import unshadow_checkout

unshadow_checkout()  # `python -m klaq` from the checkout root must still import transformers

from klaq.cli import main  # noqa: E402

main(prog_name="klaq")
