"""Community releases, the product's other half.

The registry store, the validation gate, semantic versions, signing and verification,
patches between releases, model cards and exports. Users who never run a round use it;
it never imports Flower or the coordinator.
"""
