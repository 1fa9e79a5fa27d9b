"""The command-line tools beside the stages (`medlava TOOL --help`): doctor, check-model, convert, export, predict,
compare. Each module has main(argv); nothing below imports them."""
