"""wazuh-cluster: a pure-Python implementation of the Wazuh 3.0 manager cluster."""
from __future__ import absolute_import, division, print_function

__version__ = "3.0.0+py.1"
