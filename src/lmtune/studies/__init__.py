"""Commands above the training spine: compare methods, several seeds, hyperparameter search (and its report), choose
a pretrained model (select), profile the data (inspect)."""
