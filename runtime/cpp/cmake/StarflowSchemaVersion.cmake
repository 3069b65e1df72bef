# STARFLOW_SCHEMA_VERSION: the manifest schema version libstarflow reads, from one place, the
# generated schema's const (included by the library's and the fuzz targets' projects).
set(STARFLOW_MANIFEST_SCHEMA
    "${CMAKE_CURRENT_LIST_DIR}/../../../starflow/contract/manifest.schema.json" CACHE FILEPATH
    "starflow/contract/manifest.schema.json (libstarflow reads the manifests it describes)")
if(NOT EXISTS "${STARFLOW_MANIFEST_SCHEMA}")
  message(FATAL_ERROR "STARFLOW_MANIFEST_SCHEMA='${STARFLOW_MANIFEST_SCHEMA}' does not exist.")
endif()
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${STARFLOW_MANIFEST_SCHEMA}")
file(READ "${STARFLOW_MANIFEST_SCHEMA}" _sf_schema)
string(JSON STARFLOW_SCHEMA_VERSION GET "${_sf_schema}" properties schema_version const)
message(STATUS "starflow manifest schema version ${STARFLOW_SCHEMA_VERSION}")
