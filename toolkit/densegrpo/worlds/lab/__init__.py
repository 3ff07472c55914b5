"""The credit-assignment lab: a low-dimensional world with a closed-form base policy and an
analytic reward whose decision stage can be chosen (:mod:`densegrpo.worlds.lab.world`)."""
