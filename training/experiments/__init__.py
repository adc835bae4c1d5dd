"""Paper-reproduction experiments: ``python -m training.experiments <suite> --help``.

* :mod:`.runner`: training runs cached by a hash of config, data and code (resumable);
* :mod:`.suites`: what each table/figure trains and writes;
* :mod:`.tables`: Markdown tables with paired significance rows;
* :mod:`.stats`: paired t-test, Wilcoxon signed-rank, silhouette coefficient (numpy only);
* :mod:`.tsne`: t-SNE and the user/item sample of the representation study;
* :mod:`.plots`: PNG figures (matplotlib, the optional ``experiments`` extra).
"""
