package dev.acorn

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.Properties

/**
 * The models and the Rust API's results that tests/tests/jvm_api.rs writes before it runs these
 * tests (`cargo test --release -p acorn-tests --test jvm_api`): converted `.acorn` files, their
 * inputs, and what the Rust API computed on them, which the Kotlin API must equal bit for bit.
 */
object Fixtures {
    val dir: File by lazy {
        val d = System.getProperty("acorn.fixtures").orEmpty()
        require(d.isNotEmpty() && File(d, "fixtures.properties").isFile) {
            "no fixtures (system property acorn.fixtures='$d'): run these tests through " +
                "`cargo test --release -p acorn-tests --test jvm_api`, which writes them"
        }
        File(d)
    }

    private val props: Properties by lazy {
        Properties().apply { File(dir, "fixtures.properties").inputStream().use { load(it) } }
    }

    fun string(key: String): String = props.getProperty(key) ?: error("fixtures.properties has no '$key'")
    fun int(key: String): Int = string(key).toInt()
    fun path(key: String): String = File(dir, string(key)).path

    private fun le(key: String): ByteBuffer = ByteBuffer.wrap(File(dir, string(key)).readBytes()).order(ByteOrder.LITTLE_ENDIAN)

    fun longs(key: String): LongArray = le(key).asLongBuffer().let { b -> LongArray(b.remaining()) { b.get(it) } }
    fun floats(key: String): FloatArray = le(key).asFloatBuffer().let { b -> FloatArray(b.remaining()) { b.get(it) } }
    fun ints(key: String): IntArray = string(key).split(",").filter { it.isNotEmpty() }.map { it.trim().toInt() }.toIntArray()
}

/** The bits of each float: equality of these is equality bit for bit. */
fun FloatArray.bits(): IntArray = IntArray(size) { java.lang.Float.floatToRawIntBits(this[it]) }
