"""The package's commands besides ``rag-train`` (``rag_lightning.cli``) and ``rag-eval-kilt``
(``rag_lightning.eval_kilt``), one module each, installed as console scripts (pyproject.toml):

- ``rag-evaluate``: a checkpoint's answers, EM / F1 and recall@k on the test (or val) questions (``evaluate``);
- ``rag-build-index``: prepare once: convert the corpus, embed it, save the index under its stamp (``build_index``);
- ``rag-export``: a checkpoint's generator as a plain ``save_pretrained`` directory (``export``);
- ``rag-eval-retrieval``: retrieval alone: recall@k, gold recall, entropy, distinct top-1 (``eval_retrieval``).

One convention (``common``): Hydra apps on the package's configs (``conf/<command>.yaml``, each ``train.yaml``
plus its own keys, so the training overrides mean the same thing); ``ckpt_path=`` names a checkpoint, whose
run's ``.hydra/config.yaml`` is reused (``run_config``; overrides on the command line win); outputs under
``logs/<command>/runs/<date_time>``, the results written to ``results.json`` there as well as printed.
"""
