"""One LightningModule per method: only what differs between papers.

``dpgen.methods.registry.METHODS`` maps each name to its module's class. The names alone are
here: validating a config should not import the modules (Lightning, diffusers: seconds before a
refusal).
"""

METHOD_NAMES = ("nonprivate", "dpdm", "dpldm", "privimage", "feta", "feta_privimage")
