// weightd/export.h — symbol visibility for the shared client and shim libraries.
#pragma once

#if defined(WEIGHTD_BUILDING_LIBRARY)
#define WEIGHTD_API __attribute__((visibility("default")))
#else
#define WEIGHTD_API
#endif
