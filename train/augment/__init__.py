"""Knowledge augmentation of a CPT corpus (launch/augment.py; docs/augment.md).

    config.py     the schemas (conf/augment_job.yaml, conf/augment/<preset>.yaml)
    methods.py    the method registry: one AugmentMethod each (rules, rewrite, entigraph, repeat)
    text.py       sentences, numbers with units, named entities: what the rules and the filter read
    rules.py      rule-based, no model: reading-comprehension tasks and permutations (a registry)
    generation.py prompt rendering and the generation backends (transformers, vLLM) of the model methods
    rewrite.py    model-based rewriting (WRAP prompts), sharded and resumable, with the fact filter
    entigraph.py  entity-pair synthesis through the same machinery
    run.py        read the corpus as data.cpt does, run the chosen method, publish the dataset and manifest
"""
