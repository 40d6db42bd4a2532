package dev.acorn

/**
 * A `.acorn` model, memory-mapped. Thread-safe: any number of [Session]s and [Generator]s may
 * share it. [close] it when done (sessions made from it stay usable until they are closed).
 *
 * ```
 * Model.open(path).use { model ->
 *     model.newSession().use { session ->
 *         val out = session.run(mapOf("input_ids" to Tensor.of(ids, 1, n), ...))
 *     }
 * }
 * ```
 */
class Model private constructor(handle: Long) : AutoCloseable {
    @Volatile private var handle: Long = handle
    private var session: Session? = null

    /** The declared inputs. */
    val inputs: List<TensorInfo> get() = io(false)

    /** The declared outputs. */
    val outputs: List<TensorInfo> get() = io(true)

    private fun io(outputs: Boolean): List<TensorInfo> {
        val h = live()
        return (0 until Native.ioCount(h, outputs)).map { i ->
            TensorInfo(Native.ioName(h, outputs, i), DType.of(Native.ioDtype(h, outputs, i)), Native.ioShape(h, outputs, i))
        }
    }

    /** A new session (its own buffers and [threads] worker threads; 0 means 1). */
    @JvmOverloads
    fun newSession(threads: Int = 1): Session = Session(Native.sessionNew(live(), threads))

    /** Runs the model once on a session of its own (made at the first call, one thread). */
    @Synchronized
    fun run(inputs: Map<String, Tensor>): Map<String, Tensor> {
        val s = session ?: newSession().also { session = it }
        return s.run(inputs)
    }

    /**
     * A text generator over this model (a decoder `.acorn` with an embedded tokenizer), with a
     * KV cache of [maxContext] positions (0 means 2048).
     */
    @JvmOverloads
    fun newGenerator(threads: Int = 1, maxContext: Int = 0): Generator =
        Generator(Native.generatorNew(live(), threads, maxContext))

    /** The intent classifier stored in this model (`acorn convert --train`). */
    @JvmOverloads
    fun newClassifier(threads: Int = 1): Classifier = Classifier(Native.classifierNew(live(), threads))

    /** Sentence embeddings of text from this encoder (converted with its tokenizer). */
    @JvmOverloads
    fun newEmbedder(threads: Int = 1): Embedder = Embedder(Native.embedderNew(live(), threads))

    internal fun live(): Long = handle.also { check(it != 0L) { "the model is closed" } }

    /** Frees the model (idempotent). */
    @Synchronized
    override fun close() {
        session?.close()
        session = null
        val h = handle
        handle = 0
        if (h != 0L) Native.modelFree(h)
    }

    companion object {
        /** Opens (memory-maps) a `.acorn` file. */
        @JvmStatic
        fun open(path: String): Model = Model(Native.modelOpen(path))

        /**
         * Maps the model stored in [length] bytes of an open file from byte [offset], without a
         * copy: an uncompressed asset in the app's APK, say
         * (`assets.openFd("model.acorn").use { Model.openFd(it.parcelFileDescriptor.fd,
         * it.startOffset, it.length) }`). The runtime duplicates the descriptor, so the caller
         * may close its own right away. Read in place when [offset] is a multiple of 8.
         */
        @JvmStatic
        fun openFd(fd: Int, offset: Long, length: Long): Model = Model(Native.modelOpenFd(fd, offset, length))

        /** Opens a model from bytes in memory (an Android asset read whole, say). */
        @JvmStatic
        fun fromBytes(bytes: ByteArray): Model = Model(Native.modelOpenBytes(bytes))

        /** The native library's version. */
        @JvmStatic
        val version: String get() = Native.version()
    }
}

/**
 * A session: runs its model with its own buffers. One run at a time (calls from several threads
 * wait for each other); use one session per thread to run in parallel.
 */
class Session internal constructor(handle: Long) : AutoCloseable {
    @Volatile private var handle: Long = handle

    /**
     * Runs the model on named inputs and returns every output by name (copied into new arrays:
     * they stay valid after the next run).
     */
    @Synchronized
    fun run(inputs: Map<String, Tensor>): Map<String, Tensor> {
        val h = handle
        check(h != 0L) { "the session is closed" }
        val list = inputs.entries.toList()
        Native.sessionRun(
            h,
            Array(list.size) { list[it].key },
            IntArray(list.size) { list[it].value.dtype.code },
            Array(list.size) { list[it].value.shape },
            Array(list.size) { list[it].value.data }
        )
        val out = LinkedHashMap<String, Tensor>()
        for (i in 0 until Native.outputCount(h)) {
            out[Native.outputName(h, i)] =
                Tensor.fromNative(Native.outputDtype(h, i), Native.outputShape(h, i), Native.outputData(h, i))
        }
        return out
    }

    /** Frees the session (idempotent). */
    @Synchronized
    override fun close() {
        val h = handle
        handle = 0
        if (h != 0L) Native.sessionFree(h)
    }
}
