"""Prints where `cmake --install` puts the package for this interpreter under prefix argv[1]:
the directory this interpreter searches for packages installed under that prefix."""
import sys
import sysconfig

prefix = sys.argv[1].rstrip("/") or "/"
if "deb_system" in sysconfig.get_scheme_names():
    # Debian's interpreter searches /usr/lib/python3/dist-packages for the system's packages and
    # <prefix>/lib/python3.X/dist-packages for /usr/local and the like.
    if prefix == "/usr":
        print(sysconfig.get_path("platlib", "deb_system"))
    else:
        print(f"{prefix}/lib/python{sys.version_info.major}.{sys.version_info.minor}/dist-packages")
else:
    print(sysconfig.get_path("platlib", "posix_prefix", vars={"platbase": prefix, "base": prefix}))
