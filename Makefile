# `make deb` builds the Debian package with Debian's own tools (dpkg-buildpackage, debhelper,
# pybuild) and writes dist/appliance_<version>_all.deb. The packaging lives in packaging/debian;
# the package is built from a copy of the sources laid out with it as debian/, under build/deb.
# Needs: apt-get install debhelper dh-python python3-setuptools (scripts/debian-packages.sh).

VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' appliance/__init__.py)
CHANGELOG_VERSION = $(shell dpkg-parsechangelog -l packaging/debian/changelog -S Version)
BUILD_DIR ?= build/deb
DIST ?= dist
SOURCE = $(BUILD_DIR)/appliance-$(VERSION)
DEB = appliance_$(VERSION)_all.deb
# What goes into the package: the import packages, their build metadata, and packaging/.
SOURCES = appliance pac certs setup.py pyproject.toml README.md appliance.toml packaging
# Debian's tools with Debian's python3, never a virtualenv's or pyenv's that comes first on PATH.
DEBIAN_ENV = env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin

.PHONY: deb
deb:
	@if [ "$(VERSION)" != "$(CHANGELOG_VERSION)" ]; then \
	    echo "appliance/__init__.py says $(VERSION), packaging/debian/changelog says" \
	         "$(CHANGELOG_VERSION): add an entry (dch -c packaging/debian/changelog -v $(VERSION))"; \
	    exit 1; fi
	rm -rf $(BUILD_DIR)
	mkdir -p $(SOURCE) $(DIST)
	tar -cf - --exclude=__pycache__ --exclude='*.pyc' $(SOURCES) | tar -xf - -C $(SOURCE)
	mv $(SOURCE)/packaging/debian $(SOURCE)/debian
	cd $(SOURCE) && $(DEBIAN_ENV) dpkg-buildpackage -us -uc -b
	cp $(BUILD_DIR)/$(DEB) $(DIST)/$(DEB)
	@echo "built $(DIST)/$(DEB)"
