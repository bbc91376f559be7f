# SPDX-License-Identifier: Apache-2.0
# Finds xxHash's header, xxhash.h (kvcache compiles xxHash inline: no library to link).
#
# Defines the imported target xxHash::xxhash (unless a target of that name exists already, as
# xxHash's own CMake package makes it), and xxHash_FOUND, xxHash_INCLUDE_DIR, xxHash_VERSION.
# Looks where pkg-config's libxxhash says first, then in the usual places; set
# xxHash_INCLUDE_DIR to choose. Debian and Ubuntu: apt-get install libxxhash-dev.
include(FindPackageHandleStandardArgs)

find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(PC_xxHash QUIET libxxhash)
endif()
find_path(xxHash_INCLUDE_DIR xxhash.h HINTS ${PC_xxHash_INCLUDEDIR} ${PC_xxHash_INCLUDE_DIRS})
mark_as_advanced(xxHash_INCLUDE_DIR)

if(xxHash_INCLUDE_DIR AND EXISTS "${xxHash_INCLUDE_DIR}/xxhash.h")
  file(STRINGS "${xxHash_INCLUDE_DIR}/xxhash.h" _xxhash_version_lines
       REGEX "^#define XXH_VERSION_(MAJOR|MINOR|RELEASE) +[0-9]+")
  foreach(part IN ITEMS MAJOR MINOR RELEASE)
    string(REGEX MATCH "XXH_VERSION_${part} +([0-9]+)" _ "${_xxhash_version_lines}")
    set(_xxhash_${part} "${CMAKE_MATCH_1}")
  endforeach()
  if(NOT _xxhash_MAJOR STREQUAL "")
    set(xxHash_VERSION "${_xxhash_MAJOR}.${_xxhash_MINOR}.${_xxhash_RELEASE}")
  endif()
  unset(_xxhash_version_lines)
endif()

find_package_handle_standard_args(xxHash
  REQUIRED_VARS xxHash_INCLUDE_DIR
  VERSION_VAR xxHash_VERSION
  REASON_FAILURE_MESSAGE "xxhash.h not found: install libxxhash-dev (Debian, Ubuntu) or set xxHash_INCLUDE_DIR")

if(xxHash_FOUND AND NOT TARGET xxHash::xxhash)
  add_library(xxHash::xxhash INTERFACE IMPORTED)
  set_target_properties(xxHash::xxhash PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${xxHash_INCLUDE_DIR}")
endif()
