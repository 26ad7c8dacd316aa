"""Applications composed of library calls: the newcomer demo (:mod:`pconv.apps.demo`) and the local S3 server that
the demo, the tests and the benchmarks share (:mod:`pconv.apps.local_s3`). Nothing in the library imports this
package; the ``pconv demo`` command runs the demo.

May import: any library package."""
