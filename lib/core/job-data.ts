/**
 * What the plugin stores in a BullMQ job's data, read by the worker helper: shared by the upload
 * and create routes that write it and the workers that read it.
 */
export interface UploadJobData {
  owner: string
  kind: string
  file: { key: string, name: string, size: number, type: string }
  fields: Record<string, string>
}
