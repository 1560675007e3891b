"""``python -m unlearn.sisa {train,forget,predict,verify,status} MODEL_DIR ...``"""

import sys

from unlearn.sisa.cli import cli

sys.exit(cli())
