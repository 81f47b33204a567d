"""The paper's diagnostics of a trained student (``deitlt analyze``, docs/analysis.md).

* :mod:`.attention`: mean attention distance (Raghu et al.) and attention rollout (Abnar & Zuidema);
* :mod:`.features`: PCA rank of token features, CLS/DIST cosine distance, per-group means;
* :mod:`.teacher`: teacher output entropy on in-distribution vs strongly augmented, mixed images;
* :mod:`.accuracy`: per-class accuracy of CLS, DIST and their mean vs training count;
* :mod:`.probe` / :mod:`.loading`: the models, from an export or a run directory;
* :mod:`.collect` / :mod:`.run`: one pass over eval images, then plots (:mod:`.plots`) + tables;
* :mod:`.tracked`: the run's MLflow run (tracked CLS/DIST cosine in, plots and tables out).
"""
