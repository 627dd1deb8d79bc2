"""Downstream tasks: sentence and sentence-pair classification (GLUE, local files, any set described
in the recipe, the offline Rotten Tomatoes task) in ``classification``, SQuAD v1.1 in ``squad``."""
