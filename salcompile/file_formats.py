"""The dataset file formats `salcompile.data.load_file` reads (torch-free, so that the command
line's --help can list them without importing torch)."""

FILE_FORMATS = {
    ".npz": "numpy arrays x_train, y_train, x_test, y_test (np.savez; x any numeric shape "
            "[N, ...], y integer class ids [N]); or x, y alone: seeded 80/20 split",
    ".csv": "a header row, one column named `label` (integer class ids), every other column a "
            "numeric feature; seeded 80/20 split, standardised",
    "folder": "x_train.pt, y_train.pt, x_test.pt, y_test.pt, each torch.save(tensor)",
    ".txt": "any UTF-8 text: a character language model (next-character targets) over windows "
            "of seq_len characters; the first 90% of the text trains, the rest tests",
}
