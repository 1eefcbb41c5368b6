/* The plugin ABI is header-only; this file gives the target a source. */
#include "quiesce_plugin.h"
