"""Import hook installed by piecewise_quant_autoload.pth (see integrations)."""
