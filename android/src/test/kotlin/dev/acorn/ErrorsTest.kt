package dev.acorn

import java.io.File
import java.nio.ByteBuffer
import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertSame
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

/** Bad input through the Kotlin API: an exception with the runtime's message, never a crash. */
class ErrorsTest {
    private val minilm = Fixtures.path("minilm.model")

    private fun refused(want: Set<Status>, f: () -> Unit): AcornException {
        val e = assertThrows(AcornException::class.java) { f() }
        assertTrue(e.status in want, "status ${e.status} (${e.message}), expected one of $want")
        assertTrue(!e.message.isNullOrEmpty())
        return e
    }

    private fun ids(n: Long) = Tensor.of(LongArray(n.toInt()) { 101 }, 1, n)

    @Test
    fun badFilesAreRefused() {
        refused(setOf(Status.IO)) { Model.open("/nonexistent/model.acorn") }
        refused(setOf(Status.FORMAT, Status.CHECKSUM)) { Model.open(Fixtures.path("damaged")) }
        refused(setOf(Status.INVALID_ARGUMENT)) { Model.openFd(-1, 0, 16) }
        refused(setOf(Status.IO)) { Model.openFd(987654, 0, 16) }
        refused(setOf(Status.INVALID_ARGUMENT)) { Model.openFd(0, -1, 16) }
        refused(setOf(Status.FORMAT)) { Model.fromBytes(ByteArray(0)) }
        refused(setOf(Status.FORMAT)) { Model.fromBytes("not a model at all".toByteArray()) }
        val dir = createTempDir()
        try {
            refused(setOf(Status.IO, Status.FORMAT)) { Model.open(dir.path) }
        } finally {
            dir.deleteRecursively()
        }
    }

    @Test
    fun badInputsAreRefusedAndTheSessionGoesOn() {
        Model.open(minilm).use { model ->
            model.newSession().use { s ->
                val mask = Tensor.of(LongArray(4) { 1 }, 1, 4)
                // Wrong dtype: floats for token ids.
                val e = refused(setOf(Status.INPUT)) {
                    s.run(mapOf("input_ids" to Tensor.of(FloatArray(4), 1, 4), "attention_mask" to mask))
                }
                assertTrue(e.message!!.contains("input_ids"), e.message)
                // A missing input, an unknown one, a wrong rank, mismatched lengths.
                refused(setOf(Status.INPUT)) { s.run(mapOf("input_ids" to ids(4))) }
                refused(setOf(Status.INPUT)) { s.run(mapOf("input_ids" to ids(4), "attention_mask" to mask, "nope" to mask)) }
                refused(setOf(Status.INPUT)) {
                    s.run(mapOf("input_ids" to Tensor.of(LongArray(4), 4), "attention_mask" to Tensor.of(LongArray(4), 4)))
                }
                refused(setOf(Status.INPUT, Status.NODE)) { s.run(mapOf("input_ids" to ids(5), "attention_mask" to mask)) }
                // The session still works.
                val out = s.run(mapOf("input_ids" to ids(4), "attention_mask" to mask))
                assertEquals(384, out.getValue(Fixtures.string("minilm.output")).floats().size)
            }
        }
    }

    @Test
    fun malformedTensorsAreRefusedBeforeTheyReachTheRuntime() {
        assertThrows(IllegalArgumentException::class.java) { Tensor.of(FloatArray(5), 2, 3) }
        assertThrows(IllegalArgumentException::class.java) { Tensor.of(FloatArray(0), -1) }
        assertThrows(IllegalArgumentException::class.java) { Tensor.of(ByteBuffer.allocate(16), DType.F32, 4) }
        assertThrows(IllegalArgumentException::class.java) {
            Tensor.of(ByteBuffer.allocateDirect(6).order(java.nio.ByteOrder.nativeOrder()), DType.F32, 1)
        }
        // A direct buffer left in its default big-endian order would be read as other numbers.
        assertThrows(IllegalArgumentException::class.java) {
            Tensor.of(ByteBuffer.allocateDirect(16).order(java.nio.ByteOrder.BIG_ENDIAN), DType.F32, 4)
        }
        assertThrows(IllegalArgumentException::class.java) { Tensor.ofBytes(ByteArray(4), longArrayOf(4), DType.F32) }
        assertThrows(IllegalStateException::class.java) { Tensor.of(FloatArray(1), 1).longs() }
    }

    @Test
    fun closedObjectsAreRefusedAndCloseTwiceIsHarmless() {
        val model = Model.open(minilm)
        val session = model.newSession()
        model.close()
        model.close()
        // A session outlives its closed model.
        val out = session.run(mapOf("input_ids" to ids(3), "attention_mask" to Tensor.of(LongArray(3) { 1 }, 1, 3)))
        assertTrue(out.containsKey(Fixtures.string("minilm.output")))
        session.close()
        session.close()
        assertThrows(IllegalStateException::class.java) { session.run(emptyMap()) }
        assertThrows(IllegalStateException::class.java) { model.inputs }
        assertThrows(IllegalStateException::class.java) { model.newSession() }
        // Stale handles reaching the library directly are refused by its handle registry.
        refused(setOf(Status.INVALID_HANDLE)) { Native.sessionRun(1L shl 40, arrayOf(), IntArray(0), arrayOf(), arrayOf()) }
        refused(setOf(Status.INVALID_HANDLE)) { Native.modelFree(0) }
    }

    @Test
    fun generationErrors() {
        // An encoder has no tokenizer to generate with.
        Model.open(minilm).use { model -> refused(setOf(Status.NO_TEXT, Status.GRAPH, Status.UNSUPPORTED)) { model.newGenerator() } }
        Model.open(Fixtures.path("smollm2.model")).use { model ->
            model.newGenerator(maxContext = 64).use { gen ->
                refused(setOf(Status.INVALID_ARGUMENT)) { gen.generate("hi", GenerateOptions(maxTokens = -1)) }
                // The listener's own exception reaches the caller unchanged and stops the run.
                val boom = IllegalStateException("listener failed")
                val e = assertThrows(IllegalStateException::class.java) {
                    gen.generate("The capital of France is", GenerateOptions(maxTokens = 8)) { _, _ -> throw boom }
                }
                assertSame(boom, e)
                // Generating from inside a listener on the same generator: busy, not a deadlock.
                gen.reset()
                val busy = assertThrows(AcornException::class.java) {
                    gen.generate("Hello", GenerateOptions(maxTokens = 4)) { _, _ -> gen.generate("again"); true }
                }
                assertEquals(Status.BUSY, busy.status)
                // A prompt longer than the context is refused; the generator goes on afterwards.
                gen.reset()
                refused(setOf(Status.LIMIT, Status.INPUT)) { gen.generate("word ".repeat(200)) }
                gen.reset()
                assertArrayEquals(
                    Fixtures.ints("smollm2.expected").copyOf(4),
                    gen.generate(Fixtures.string("smollm2.prompt"), GenerateOptions(maxTokens = 4)).tokens
                )
            }
        }
    }

    @Test
    fun panicsSurfaceAsExceptions() {
        assertEquals(Status.PANIC, assertThrows(AcornException::class.java) { Native.debugPanic() }.status)
        assertEquals(Status.PANIC, assertThrows(AcornException::class.java) { Native.debugJniPanic() }.status)
        // The library works on after both.
        Model.open(minilm).use { m ->
            val out = m.run(mapOf("input_ids" to ids(3), "attention_mask" to Tensor.of(LongArray(3) { 1 }, 1, 3)))
            assertTrue(out.containsKey(Fixtures.string("minilm.output")))
        }
    }

    @Test
    fun statusCodesMatchTheCHeader() {
        // Spot checks against include/acorn.h (ACORN_STATUS_*): the runtime's kinds and the ABI's own.
        val header = File(Fixtures.string("header")).readText()
        for (s in Status.values().filter { it != Status.UNKNOWN }) {
            assertTrue(header.contains("ACORN_STATUS_${s.name} = ${s.code},"), "ACORN_STATUS_${s.name} = ${s.code}")
        }
        for (d in DType.values()) {
            assertTrue(header.contains("ACORN_DTYPE_${d.name} = ${d.code},"), "ACORN_DTYPE_${d.name} = ${d.code}")
        }
    }
}
